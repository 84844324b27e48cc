"""Preference data in: format readers and adapters (``formats``), ingest with de-duplication, hash splits and
quarantine (``ingest``), and the quarantine file of rejected rows (``quarantine``)."""
