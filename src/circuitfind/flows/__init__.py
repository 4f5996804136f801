"""The Prefect flows: :mod:`~circuitfind.flows.sweep_flow` (the main job and the compare flow),
:mod:`~circuitfind.flows.study_flow` (the settings study), :mod:`~circuitfind.flows.diff_flow` (run against run),
:mod:`~circuitfind.flows.checkpoints_flow` (circuits over training), :mod:`~circuitfind.flows.deploy` (the
scheduled deployment) and :mod:`~circuitfind.flows.server` (the local Prefect server a command-line run owns).

The checkout's top-level ``flows/*.py`` are thin entry points importing from here, so an installed
package carries the flows too. Importing this package does not import Prefect.
"""

import os

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Prefect's own temporary server (flows called from Python without a server) gets minutes, not 20 s, for
# its first start, which creates its database; read when Prefect is imported, so set before that.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")
