"""
C{python -m txcluster}: the C{txcluster} control command.
"""

from txcluster._cli import script

if __name__ == "__main__":
    script()
