package agentvm.tools

agent(profile) := {"pod": "p", "namespace": "ns", "service_account": "sa", "profile": profile}

call(upstream, tool, args, profile) := {
	"method": "tools/call",
	"upstream": upstream,
	"tool": tool,
	"arguments": args,
	"agent": agent(profile),
}

test_upstream_tools_are_allowed if {
	allow with input as call("github", "github__create_issue", {}, "no-exec")
	count(deny) == 0 with input as call("github", "github__create_issue", {}, "no-exec")
}

test_exec_is_allowed_with_an_exec_surface if {
	allow with input as call("agentvm", "exec", {"argv": ["ls", "-l"]}, "sidecar-exec")
	count(deny) == 0 with input as call("agentvm", "exec", {"argv": ["ls"]}, "sidecar-exec")
}

test_exec_is_not_allowed_without_an_exec_surface if {
	not allow with input as call("agentvm", "exec", {"argv": ["ls"]}, "no-exec")
}

test_exec_listing_needs_no_arguments if {
	allow with input as {"method": "tools/list", "upstream": "agentvm", "tool": "exec", "agent": agent("exec-pod")}
	count(deny) == 0 with input as {"method": "tools/list", "upstream": "agentvm", "tool": "exec", "agent": agent("exec-pod")}
}

test_blocked_programs_are_denied_by_base_name if {
	deny["exec of nsenter is blocked"] with input as call("agentvm", "exec", {"argv": ["/usr/bin/nsenter", "-t", "1"]}, "sidecar-exec")
}

test_bad_argv_is_denied if {
	count(deny) == 1 with input as call("agentvm", "exec", {"argv": []}, "sidecar-exec")
	count(deny) == 1 with input as call("agentvm", "exec", {"argv": [1]}, "sidecar-exec")
	count(deny) == 1 with input as call("agentvm", "exec", {}, "sidecar-exec")
	count(deny) == 1 with input as call("agentvm", "exec", {"argv": {"0": "ls"}}, "sidecar-exec")
}

test_an_empty_input_is_not_allowed if {
	not allow with input as {}
}

test_upstream_prompts_and_resources_are_allowed if {
	allow with input as {"method": "prompts/get", "upstream": "docs", "prompt": "docs__summarise", "arguments": {}, "agent": agent("no-exec")}
	allow with input as {"method": "resources/read", "upstream": "docs", "uri": "file:///guide.md", "agent": agent("no-exec")}
	count(deny) == 0 with input as {"method": "resources/read", "upstream": "docs", "uri": "file:///guide.md", "agent": agent("no-exec")}
}

test_nothing_is_allowed_without_an_upstream if {
	not allow with input as {"method": "resources/read", "upstream": "", "uri": "file:///x", "agent": agent("sidecar-exec")}
}
