"""File codecs: each module turns one file format into event arrays (``EVENT_DTYPE``) and back.

Pure functions of bytes or files; no dataset, split or class list lives here.
"""
