"""pandera contracts for every table that crosses a stage boundary, and nothing else.

``pairs`` (CanonicalPairs), ``tokenized`` (TokenizedPairs), ``reference`` (ReferenceLogps), ``evaluation`` (metrics and
generations), ``validation`` (collecting pandera failures per row), ``errors`` (DataError, ContractError).
"""
