"""`argen eval`."""


def register(sub):
    parser = sub.add_parser("eval", help="(not available yet in this version)")
    parser.set_defaults(func=None)
