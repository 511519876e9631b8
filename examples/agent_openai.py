"""The agent loop by hand with the plain `openai` client, against `qwenkit serve` (or any OpenAI-compatible
server): send the tools, run the calls the model makes, send their results back as tool messages.

    qwenkit serve -m demo --port 8000 &
    python examples/agent_openai.py "What is 832040 * 7?"
"""

import json
import sys

from openai import OpenAI

from qwenkit.agent import calculator, tool_schema

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
model = client.models.list().data[0].id
tools = {"calculator": calculator}  # a plain function; tool_schema reads its signature and docstring
messages = [{"role": "user", "content": sys.argv[1] if len(sys.argv) > 1 else "What is 832040 * 7?"}]

for _ in range(5):
    reply = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                           tools=[tool_schema(f) for f in tools.values()]).choices[0].message
    messages.append(reply.model_dump(exclude_none=True))
    if not reply.tool_calls:
        print(reply.content)
        break
    for call in reply.tool_calls:
        try:
            result = str(tools[call.function.name](**json.loads(call.function.arguments)))
        except Exception as e:  # the model reads the error and may try again
            result = f"error: {e}"
        print(f"[{call.function.name}({call.function.arguments}) -> {result}]")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
