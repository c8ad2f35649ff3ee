"""Start the daemon from a YAML config with ``listen`` (argv[2]) and ``api_token`` ($GPU_ROUTER_TEST_TOKEN).

The YAML keys ``listen`` and ``api_token`` are parsed by the config work in another branch; until
it lands, the daemon tests set the two Config fields here, then run the daemon exactly as the CLI does.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from gpu_router import daemon as daemon_module
from gpu_router.config import Config, load_config
from gpu_router.systemd import setup_logging


def with_api(path: str | os.PathLike[str]) -> Config:
    """The config at ``path`` with the listen address and token of this run."""
    return dataclasses.replace(
        load_config(path), listen=sys.argv[2], api_token=os.environ.get("GPU_ROUTER_TEST_TOKEN") or None
    )


def main() -> int:
    config = with_api(sys.argv[1])
    daemon_module.load_config = with_api  # a SIGHUP reload keeps the listener, as the YAML keys will
    setup_logging(config.log_level)
    return daemon_module.run_daemon(config)


if __name__ == "__main__":
    sys.exit(main())
