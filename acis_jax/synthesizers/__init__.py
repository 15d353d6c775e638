"""Synthesizers other than ACIS, the comparison arms of the evaluation protocol."""
