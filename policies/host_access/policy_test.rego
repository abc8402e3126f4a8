package agentvm

admit(spec) := {"action": "admit", "pod": {"metadata": {}, "spec": spec}}

plain := {"containers": [{"name": "agent", "image": "registry.example.com/agent:1"}]}

denied_with(spec, word) if {
	some msg in deny with input as admit(spec)
	contains(msg, word)
}

test_plain_pod_is_not_denied if {
	count(deny) == 0 with input as admit(plain)
}

test_host_network_is_denied if {
	denied_with(object.union(plain, {"hostNetwork": true}), "hostNetwork")
}

test_host_network_false_is_fine if {
	count(deny) == 0 with input as admit(object.union(plain, {"hostNetwork": false}))
}

test_host_pid_ipc_and_shared_process_namespace_are_denied if {
	spec := object.union(plain, {"hostPID": true, "hostIPC": true, "shareProcessNamespace": true})
	denied_with(spec, "hostPID")
	denied_with(spec, "hostIPC")
	denied_with(spec, "shareProcessNamespace")
}

test_host_path_volume_is_denied_by_name if {
	denied_with(object.union(plain, {"volumes": [{"name": "docker", "hostPath": {"path": "/var/run"}}]}), "docker")
}

test_privileged_init_container_is_denied if {
	spec := object.union(plain, {"initContainers": [{"name": "setup", "image": "registry.example.com/setup:1", "securityContext": {"privileged": true}}]})
	denied_with(spec, "setup")
}

test_host_port_is_denied_and_zero_is_fine if {
	denied_with({"containers": [{"name": "a", "image": "registry.example.com/a:1", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}, "hostPort")
	count(deny) == 0 with input as admit({"containers": [{"name": "a", "image": "registry.example.com/a:1", "ports": [{"containerPort": 80, "hostPort": 0}]}]})
}

test_added_capabilities_are_denied if {
	denied_with({"containers": [{"name": "a", "image": "registry.example.com/a:1", "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}}}]}, "NET_ADMIN")
}

test_empty_capabilities_add_is_fine if {
	count(deny) == 0 with input as admit({"containers": [{"name": "a", "image": "registry.example.com/a:1", "securityContext": {"capabilities": {"add": []}}}]})
}

test_explicit_root_is_denied_at_both_levels if {
	denied_with({"containers": [{"name": "a", "image": "registry.example.com/a:1", "securityContext": {"runAsUser": 0}}]}, "runAsUser 0")
	denied_with(object.union(plain, {"securityContext": {"runAsUser": 0}}), "pod securityContext")
}

test_ephemeral_containers_are_checked_too if {
	denied_with(object.union(plain, {"ephemeralContainers": [{"name": "dbg", "image": "registry.example.com/dbg:1", "securityContext": {"privileged": true}}]}), "dbg")
}

test_windows_is_denied if {
	denied_with(object.union(plain, {"os": {"name": "windows"}}), "Windows")
}

test_rules_apply_only_when_admitting if {
	count(deny) == 0 with input as {"action": "update", "pod": {"spec": {"hostNetwork": true}}}
}

test_missing_pod_is_not_an_error if {
	count(deny) == 0 with input as {"action": "connect", "pod": null}
}
