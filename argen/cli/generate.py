"""`argen generate`."""


def register(sub):
    parser = sub.add_parser("generate", help="(not available yet in this version)")
    parser.set_defaults(func=None)
