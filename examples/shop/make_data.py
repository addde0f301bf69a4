"""Write orders.jsonl: one row per (item, quantity) with the question and its answer.

Run from anywhere: ``python examples/shop/make_data.py``. Every number involved stays below
1000, which the built-in tokenizer writes as one token.
"""

import json
from pathlib import Path

from task import PRICES

QUANTITIES = range(2, 10)


def main() -> None:
    out = Path(__file__).with_name("orders.jsonl")
    with out.open("w") as f:
        for item, price in PRICES.items():
            for qty in QUANTITIES:
                row = {"item": item, "quantity": qty, "answer": qty * price}
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
