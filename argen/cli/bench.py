"""`argen bench`."""


def register(sub):
    parser = sub.add_parser("bench", help="(not available yet in this version)")
    parser.set_defaults(func=None)
