"""Builders shared by several test files."""
from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from components.hashing import sha256_file


def make_random_vit_t_checkpoint(path: str | Path, seed: int = 0) -> str:
    """A randomly initialised state dict of the real MobileSAM vit_t architecture (same keys and shapes
    as mobile_sam.pt, so every loader accepts it); returns its sha256."""
    import torch
    from mobile_sam import sam_model_registry

    torch.manual_seed(seed)
    model = sam_model_registry["vit_t"]()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return sha256_file(path)


class JSONHandler(BaseHTTPRequestHandler):
    """Base for the stand-in REST servers of contract tests: quiet, answers JSON."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
