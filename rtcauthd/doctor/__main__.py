"""``python -m rtcauthd.doctor SERVER_NAME``."""

import sys

from rtcauthd.doctor import main

sys.exit(main())
