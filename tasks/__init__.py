"""Prefect tasks: thin adapters of `providers` and `hyper2kvm` to Prefect (retries,
progress, logging, cancellation)."""

import logging

# what the providers log at INFO (snapshot ids, retried blocks, fallbacks) belongs in the
# job's logs: the daemon names them in PREFECT_LOGGING_EXTRA_LOGGERS, and their level is
# set here, in the room that runs them under Prefect
logging.getLogger("providers").setLevel(logging.INFO)
