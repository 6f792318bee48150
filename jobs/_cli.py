"""Small argparse helpers shared by the job entry points."""

from __future__ import annotations

import argparse


def positive(kind):
    """An argparse ``type`` that parses with ``kind`` and refuses values <= 0."""

    def parse(text: str):
        v = kind(text)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return v

    return parse
