"""Stages for nimpipe: each module is one plugin, registered under a short name."""
