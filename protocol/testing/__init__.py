"""Test tooling for the protocol stack (not used by the server itself).

conformance.py  the conformance suite's fixtures, both eras (`python -m protocol.testing.conformance`)
transcript.py   golden transcripts: replay, record (`python -m protocol.testing.transcript`)
transcript_format.py  the transcript file format and its normalisation (pure)
"""
