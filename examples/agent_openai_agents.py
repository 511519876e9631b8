"""The OpenAI Agents SDK (`pip install openai-agents`) driving `qwenkit serve`: qwenkit's built-in tools (python,
calculator, read_file) as the SDK's function tools, the model behind the server's Chat Completions API.

    qwenkit serve -m demo --port 8000 &
    python examples/agent_openai_agents.py "What is 832040 * 7?"

QWENKIT_URL names another server (default http://127.0.0.1:8000/v1). The demo (0.5B) calls a tool again instead of
answering from its result, so the first tool result ends the run (`stop_on_first_tool`); with a larger model, drop
that and the model answers in its own words from the results.
"""

import asyncio
import os
import sys

from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

from qwenkit.agent import SYSTEM, builtin_tools

set_tracing_disabled(True)  # the SDK would otherwise send its traces to OpenAI
client = AsyncOpenAI(base_url=os.environ.get("QWENKIT_URL", "http://127.0.0.1:8000/v1"), api_key="none")


async def main(question: str) -> None:
    model = (await client.models.list()).data[0].id
    agent = Agent(name="assistant", instructions=SYSTEM,  # `qwenkit agent`'s prompt: it shows a small model a call
                  tools=[function_tool(f) for f in builtin_tools()],  # schemas from signatures and docstrings
                  model=OpenAIChatCompletionsModel(model=model, openai_client=client),
                  model_settings=ModelSettings(temperature=0), tool_use_behavior="stop_on_first_tool")
    result = await Runner.run(agent, question)
    for item in result.new_items:
        if item.type == "tool_call_item":
            print(f"[{item.raw_item.name}({item.raw_item.arguments})]")
        elif item.type == "tool_call_output_item":
            print(f"[-> {item.output}]")
    print(result.final_output)


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "What is 832040 * 7?"))
