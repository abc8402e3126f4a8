package agentvm

ephemeral := {"action": "ephemeral", "request": {"namespace": "team-a", "name": "agent-0"}}

connect(target, groups) := {
	"action": "connect",
	"target": target,
	"request": {"namespace": "team-a", "name": "agent-0", "subResource": "exec", "userInfo": {"groups": groups}},
}

agent_target := {"known": true, "agent": true}

test_ephemeral_containers_are_denied_by_default if {
	some msg in deny with input as ephemeral
	contains(msg, "team-a/agent-0")
}

test_ephemeral_containers_can_be_allowed if {
	count(deny) == 0 with input as ephemeral with data.agentvm_settings as {"debug": {"allow_ephemeral_containers": true}}
}

test_exec_into_agent_is_denied_by_default if {
	some msg in deny with input as connect(agent_target, ["system:authenticated"])
	contains(msg, "exec into agent pod")
}

test_exec_by_an_allowed_group_passes if {
	inp := connect(agent_target, ["system:authenticated", "platform-admins"])
	count(deny) == 0 with input as inp with data.agentvm_settings as {"debug": {"connect_allowed_groups": ["platform-admins"]}}
}

test_exec_with_no_groups_is_denied if {
	inp := {"action": "connect", "target": agent_target, "request": {"namespace": "n", "name": "p", "subResource": "attach", "userInfo": {}}}
	count(deny) == 1 with input as inp
}

test_unknown_target_is_allowed_with_a_warning_by_default if {
	inp := connect({"known": false, "agent": false}, [])
	count(deny) == 0 with input as inp
	some msg in warn with input as inp
	contains(msg, "could not look up")
}

test_unknown_target_can_be_denied if {
	inp := connect({"known": false, "agent": false}, [])
	count(deny) == 1 with input as inp with data.agentvm_settings as {"debug": {"connect_unknown_pod": "deny"}}
}

test_connect_without_subresource_or_names_is_still_denied if {
	inp := {"action": "connect", "target": agent_target, "request": {"userInfo": {"groups": []}}}
	count(deny) == 1 with input as inp
}

test_ephemeral_without_names_is_still_denied if {
	count(deny) == 1 with input as {"action": "ephemeral", "request": {}}
}
