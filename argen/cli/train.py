"""`argen train`."""


def register(sub):
    parser = sub.add_parser("train", help="(not available yet in this version)")
    parser.set_defaults(func=None)
