"""`python -m edge`: validate the configuration, then serve."""

from __future__ import annotations

import sys

from common.settings import ConfigurationError
from edge.policy import load_policy
from edge.server.serve import serve
from edge.settings import load_settings


def main() -> int:
    try:
        settings = load_settings()
        policy = load_policy(settings.policy_file)
    except ConfigurationError as error:
        print(f"edge: {error}", file=sys.stderr)
        return 2
    serve(settings, policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
