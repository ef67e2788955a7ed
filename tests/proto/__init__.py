"""Tests of the sans-IO core (pynbd.proto): records, handshake, transmission."""
