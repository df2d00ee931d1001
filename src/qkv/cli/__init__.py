"""The ``qkv`` command line: parse -> library call -> print."""
