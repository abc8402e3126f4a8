package agentvm

pod(image) := {"action": "admit", "pod": {"spec": {"containers": [{"name": "agent", "image": image}]}}}

test_trusted_image_is_allowed if {
	count(deny) == 0 with input as pod("registry.example.com/team-a/agent:1")
}

test_other_registry_is_denied_by_name if {
	some msg in deny with input as pod("evil.example.net/agent:1")
	contains(msg, "evil.example.net/agent:1")
}

test_prefix_lookalike_is_denied if {
	count(deny) == 1 with input as pod("registry.example.com.evil.example.net/agent:1")
}

test_injected_containers_are_not_checked if {
	inp := {"action": "admit", "pod": {"spec": {"initContainers": [{"name": "agentvm-proxy", "image": "agentvm/agentvm-sidecar:0.1.0"}], "containers": []}}}
	count(deny) == 0 with input as inp
}

test_image_changes_on_update_are_checked if {
	count(deny) == 1 with input as {"action": "update", "pod": {"spec": {"containers": [{"name": "a", "image": "x/y"}]}}}
}

test_connect_is_not_checked if {
	count(deny) == 0 with input as {"action": "connect", "pod": {"spec": {"containers": [{"name": "a", "image": "x/y"}]}}}
}
