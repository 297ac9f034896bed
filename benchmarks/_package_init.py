"""rlfuse.benchmarks: the benchmark suite (``rlfuse bench``; see benchmarks/README.md)."""

# An editable install is a link tree whose files are symlinks to the sources (see setup.py); look
# up this package's modules in the source folder itself first, so a new source file imports at
# once, as in any editable install. (A regular install has no symlink here: nothing changes.)
import os as _os

_source = _os.path.dirname(_os.path.realpath(__file__))
if _source != _os.path.dirname(_os.path.abspath(__file__)):
    __path__.insert(0, _source)
del _os, _source
