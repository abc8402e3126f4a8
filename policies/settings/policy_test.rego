package agentvm

test_defaults_exclude_exactly_the_system_namespaces if {
	settings.excluded_namespaces == ["kube-system", "kube-public", "kube-node-lease", "agentvm-system"]
}

test_defaults_strip_credentials if {
	settings.credentials == "strip"
}

test_overrides_merge_nested_objects if {
	s := settings with data.agentvm_settings as {"debug": {"allow_ephemeral_containers": true}}
	s.debug.allow_ephemeral_containers == true
	s.debug.connect_unknown_pod == "allow"
	s.credentials == "strip"
}

test_overrides_replace_lists if {
	s := settings with data.agentvm_settings as {"allowed_profiles": ["no-exec"]}
	s.allowed_profiles == ["no-exec"]
}
