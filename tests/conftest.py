import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GSM8K_DIR = os.path.join(ROOT, "..", "shared", "data", "gsm8k")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A BPE tokenizer trained in-test on 200 bundled problems (the same code sft.py uses)."""
    import sft
    from data_utils import generate_task

    train, _ = generate_task(200, 10, seed=7)
    texts = sft.tokenizer_corpus(train)
    return sft.train_tokenizer(texts, 400)


@pytest.fixture(scope="session")
def tiny_model(tiny_tokenizer):
    import sft
    return sft.make_model(tiny_tokenizer, hidden=32, layers=2, heads=2, mlp=64, seed=0).eval()


def reply_with_json(handler, payload, status=200):
    """Send `payload` (bytes) from an http.server handler as a JSON reply."""
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.end_headers()
    handler.wfile.write(payload)


def completions_reply(p_yes):
    """An OpenAI /v1/completions reply whose top log-probabilities give P(Yes) = p_yes."""
    return json.dumps({"choices": [{"text": " Yes", "logprobs": {"top_logprobs": [
        {" Yes": math.log(p_yes), " No": math.log(1 - p_yes)}]}}]}).encode()
