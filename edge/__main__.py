"""`python -m edge`: validate the configuration, then serve."""

from __future__ import annotations

import sys

from common.settings import ConfigurationError
from edge.policy import Policy, load_policy
from edge.server.serve import serve
from edge.settings import EdgeSettings, load_settings


def load_configuration() -> tuple[EdgeSettings, Policy]:
    """Everything the edge validates before it serves (`make run` checks it first too);
    `ConfigurationError` names what is wrong."""
    settings = load_settings()
    return settings, load_policy(settings.policy_file)


def main() -> int:
    try:
        settings, policy = load_configuration()
    except ConfigurationError as error:
        print(f"edge: {error}", file=sys.stderr)
        return 2
    serve(settings, policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
