"""Drives an MCP server with the official Python SDK (PyPI `mcp`) and prints what it saw as one
JSON document: the negotiated revision, the tool names, and the results of a few calls.

Usage: client.py URL [TOOL_PREFIX] [--exec]   (--exec also calls the proxy's exec tool)
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


async def main(url: str, prefix: str, with_exec: bool) -> None:
    out = {}
    async with streamable_http_client(url) as streams:
        read, write = streams[0], streams[1]
        async with ClientSession(read, write) as session:
            init = await session.initialize()
            out["protocol"] = field(init, "protocol_version", "protocolVersion")
            tools = await session.list_tools()
            out["tools"] = sorted(t.name for t in tools.tools)
            echo = await session.call_tool(prefix + "echo", {"message": "through agentvm"})
            out["echo"] = [c.text for c in echo.content if c.type == "text"]
            out["echo_is_error"] = field(echo, "is_error", "isError")
            total = await session.call_tool(prefix + "get-sum", {"a": 2, "b": 40})
            out["sum"] = [c.text for c in total.content if c.type == "text"]
            if with_exec:
                ran = await session.call_tool("exec", {"argv": ["sh", "-c", "echo $HOME; pwd"]})
                out["exec"] = [c.text for c in ran.content if c.type == "text"]
                out["exec_is_error"] = field(ran, "is_error", "isError")
                try:
                    blocked = await session.call_tool("exec", {"argv": ["nsenter", "-t", "1"]})
                    out["exec_blocked"] = {"is_error": field(blocked, "is_error", "isError")}
                except Exception as e:
                    out["exec_blocked"] = {"error": str(e)}
            try:
                hidden = await session.call_tool(prefix + "no-such-tool", {})
                out["unknown"] = {"is_error": field(hidden, "is_error", "isError"),
                                  "text": [c.text for c in hidden.content if c.type == "text"]}
            except Exception as e:  # the SDK raises McpError for JSON-RPC errors
                out["unknown"] = {"error": str(e)}
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "", "--exec" in sys.argv))
