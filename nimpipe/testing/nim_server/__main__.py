"""``python -m nimpipe.testing.nim_server``: serve a NIM test server in this process."""

import sys

from nimpipe.testing.nim_server.process import main

sys.exit(main())
