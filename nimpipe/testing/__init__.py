"""Test helpers for nimpipe and for code built on it: a NIM-shaped server and cassette replay."""
