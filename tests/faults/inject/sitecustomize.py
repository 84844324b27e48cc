"""Imported by Python at start-up when this folder is on PYTHONPATH (tests only): installs the step-failure hook that
``step_failure.py`` describes, if its environment variables are set."""

import step_failure

step_failure.install_from_env()
