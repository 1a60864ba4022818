from .. import _cli
from . import main

_cli.run(main)
