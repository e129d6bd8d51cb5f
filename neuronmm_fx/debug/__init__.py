"""Debugging aids: readable dumps of every graph a pass produced (:mod:`.dump`)."""
