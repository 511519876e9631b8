"""A tool-using agent from Python: the demo model, the built-in tools and one function of our own.

    python examples/agent.py "How many days are there from 2024-02-10 to 2024-12-25?"
"""

import datetime
import sys

import qwenkit
from qwenkit.agent import Agent, LocalChat, builtin_tools


def days_between(start: str, end: str) -> int:
    """The number of days from one date to another.

    Args:
        start: the first date, YYYY-MM-DD
        end: the second date, YYYY-MM-DD
    """
    return (datetime.date.fromisoformat(end) - datetime.date.fromisoformat(start)).days


model, tokenizer = qwenkit.load("demo")
agent = Agent(LocalChat(model, tokenizer, temperature=0), [*builtin_tools(), days_between],
              on_text=lambda text: print(text, end="", flush=True),
              on_call=lambda name, arguments: print(f"\n[calls {name} {arguments}]"),
              on_result=lambda name, result: print(f"[{name} returned {result}]"))
agent.ask(sys.argv[1] if len(sys.argv) > 1 else "How many days are there from 2024-02-10 to 2024-12-25?")
print()
