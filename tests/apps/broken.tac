"""
An application that cannot start: it raises while being loaded, after
printing a line on stdout and one on stderr.
"""

import sys

print("broken app: about to fail")
print("broken app: on stderr", file=sys.stderr)


def configure():
    return {}["missing setting"]


application = configure()
