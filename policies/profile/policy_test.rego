package agentvm

pod_with(labels, annotations) := {"action": "admit", "pod": {"metadata": {"labels": labels, "annotations": annotations}}}

test_no_request_gives_no_exec if {
	profile == "no-exec" with input as pod_with({}, {})
}

test_no_metadata_at_all_gives_no_exec if {
	profile == "no-exec" with input as {"action": "admit", "pod": {"spec": {}}}
}

test_label_wins_over_annotation if {
	inp := pod_with({"agentvm.dev/profile": "exec-pod"}, {"agentvm.dev/profile": "dispatcher"})
	profile == "exec-pod" with input as inp
}

test_annotation_is_read_when_no_label if {
	profile == "sidecar-exec" with input as pod_with({}, {"agentvm.dev/profile": "sidecar-exec"})
}

test_unknown_profile_is_denied_by_name if {
	inp := pod_with({"agentvm.dev/profile": "root-shell"}, {})
	not profile with input as inp
	some msg in deny with input as inp
	contains(msg, "root-shell")
}

test_profile_names_are_case_sensitive if {
	inp := pod_with({"agentvm.dev/profile": "No-Exec"}, {})
	count(deny) == 1 with input as inp
}

test_disallowed_profile_is_denied if {
	inp := pod_with({"agentvm.dev/profile": "sidecar-exec"}, {})
	some msg in deny with input as inp with data.agentvm_settings as {"allowed_profiles": ["no-exec"]}
	contains(msg, "not allowed")
}

test_known_allowed_profile_has_no_denial if {
	count(deny) == 0 with input as pod_with({"agentvm.dev/profile": "dispatcher"}, {})
}
