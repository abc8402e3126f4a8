# Tool-call policy of the agentvm proxy (package agentvm.tools).
#
# The proxy asks this policy about everything it lists and everything it forwards. `input`:
#   method     "tools/list", "tools/call", "prompts/list", "prompts/get", "resources/list",
#              "resources/templates/list", "resources/read", "resources/subscribe",
#              "resources/unsubscribe", "completion/complete" or "logging/setLevel"
#   upstream   the upstream's name from the proxy config; "agentvm" for the built-in exec tool
#   tool       tools: the name as the agent sees it ("github__create_issue", "exec")
#   prompt     prompts, and completions of a prompt's argument: the name as the agent sees it
#   uri        resources: the URI (the URI template when listing templates or completing one)
#   arguments  tool, prompt and completion arguments (absent when listing)
#   agent      {pod, namespace, service_account, profile}
# Exactly one of tool, prompt and uri is present, none for logging/setLevel. A listing entry
# and a request for it are decided by the same rules: write rules on the name, and add the
# method only where a call differs from its listing (arguments).
#
# A request goes through when `allow` is true and `deny` is empty: nothing is allowed unless a
# rule says so, and any deny message wins. The agent never sees deny messages; they go to the
# audit record, and the agent gets the same answer as for a tool, prompt or resource that does
# not exist.
#
# To write your own, copy this folder, keep the package name, and point the proxy at it with
# --policies. Rule names stay inside this package so that they never meet the webhook's rules.
package agentvm.tools

default allow := false

# Profiles with an exec surface.
exec_profiles := {"sidecar-exec", "exec-pod", "dispatcher"}

# Programs the exec tool refuses as argv[0], by base name. A speed bump, not a boundary: a
# command can start them in other ways (`env unshare`, `sh -c "unshare ..."`, a copy under
# another name); what stops them is the exec container's seccomp profile and dropped
# capabilities.
blocked_programs := {"nsenter", "mount", "umount", "chroot", "unshare", "setpriv", "capsh"}

# Tools, prompts and resources of the upstreams the platform configured are allowed.
allow if {
	input.upstream != "agentvm"
	input.upstream != ""
}

# The built-in exec tool, for profiles that have an exec surface.
allow if {
	input.upstream == "agentvm"
	input.tool == "exec"
	input.agent.profile in exec_profiles
}

deny contains msg if {
	input.method == "tools/call"
	input.tool == "exec"
	first := input.arguments.argv[0]
	is_string(first)
	program := base_name(first)
	program in blocked_programs
	msg := sprintf("exec of %s is blocked", [program])
}

deny contains "exec needs argv as a non-empty list of strings" if {
	input.method == "tools/call"
	input.tool == "exec"
	not valid_argv(input.arguments)
}

valid_argv(args) if {
	is_array(args.argv)
	count(args.argv) > 0
	every a in args.argv {
		is_string(a)
	}
}

base_name(path) := name if {
	parts := split(path, "/")
	name := parts[count(parts) - 1]
}
