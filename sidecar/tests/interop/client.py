"""Drives an MCP server with the official Python SDK (PyPI `mcp`) and prints what it saw as one
JSON document: the negotiated revision, the tool, prompt and resource names, and the results of
a few calls.

Usage: client.py URL [PREFIX] [--exec] [--modern]
  PREFIX    what the proxy puts before tool and prompt names ("everything__"); empty directly
  --exec    also call the proxy's exec tool (allowed and blocked)
  --modern  speak the stateless 2026-07-28 revision (SDK `Client(mode="2026-07-28")`) instead
            of the initialize handshake
"""

import asyncio
import json
import sys

from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


def field(obj, *names):
    """The first attribute that exists: SDK 2 uses snake_case, SDK 1 the wire names."""
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


def texts(result):
    return [c.text for c in result.content if c.type == "text"]


async def attempt(call):
    """A call's tool result, or the protocol error the SDK raised for it."""
    try:
        result = await call
        return {"is_error": field(result, "is_error", "isError"), "text": texts(result)}
    except Exception as e:  # the SDK raises MCPError for JSON-RPC errors
        return {"error": str(e), "code": getattr(getattr(e, "error", None), "code", None)}


async def exercise(session, prefix, with_exec, out):
    tools = await session.list_tools()
    out["tools"] = sorted(t.name for t in tools.tools)
    echo = await session.call_tool(prefix + "echo", {"message": "through agentvm"})
    out["echo"] = texts(echo)
    out["echo_is_error"] = field(echo, "is_error", "isError")
    total = await session.call_tool(prefix + "get-sum", {"a": 2, "b": 40})
    out["sum"] = texts(total)
    if with_exec:
        ran = await session.call_tool("exec", {"argv": ["sh", "-c", "echo $HOME; pwd"]})
        out["exec"] = texts(ran)
        out["exec_is_error"] = field(ran, "is_error", "isError")
        out["exec_blocked"] = await attempt(session.call_tool("exec", {"argv": ["nsenter", "-t", "1"]}))
    out["unknown"] = await attempt(session.call_tool(prefix + "no-such-tool", {}))
    prompts = await session.list_prompts()
    out["prompts"] = sorted(p.name for p in prompts.prompts)
    prompt = await session.get_prompt(prefix + "args-prompt", {"city": "Oslo"})
    out["prompt"] = [m.content.text for m in prompt.messages if m.content.type == "text"]
    resources = await session.list_resources()
    out["resources"] = sorted(str(r.uri) for r in resources.resources)
    first = sorted(resources.resources, key=lambda r: str(r.uri))[0]
    read = await session.read_resource(first.uri)
    out["resource_text"] = [getattr(c, "text", None) for c in read.contents]
    templated = await session.read_resource("demo://resource/dynamic/text/7")
    out["template_text"] = [getattr(c, "text", None) for c in templated.contents]


async def main(url: str, prefix: str, with_exec: bool, modern: bool) -> None:
    out = {}
    if modern:
        from mcp import Client

        async with Client(url, mode="2026-07-28") as client:
            out["protocol"] = client.protocol_version
            await exercise(client, prefix, with_exec, out)
    else:
        async with streamable_http_client(url) as streams:
            async with ClientSession(streams[0], streams[1]) as session:
                init = await session.initialize()
                out["protocol"] = field(init, "protocol_version", "protocolVersion")
                await exercise(session, prefix, with_exec, out)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    flags = [a for a in sys.argv[2:] if a.startswith("--")]
    rest = [a for a in sys.argv[2:] if not a.startswith("--")]
    asyncio.run(main(sys.argv[1], rest[0] if rest else "", "--exec" in flags, "--modern" in flags))
