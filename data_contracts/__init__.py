"""pandera contracts for every table that crosses a stage boundary, and the ingest/quarantine helpers.

``pairs`` (CanonicalPairs), ``tokenized`` (TokenizedPairs), ``reference`` (ReferenceLogps), ``evaluation`` (metrics and
generations); ``ingest`` (sources -> validated canonical pairs + report + fingerprint), ``quarantine`` (the JSONL of
rejected rows), ``errors`` (DataError, ContractError).
"""
