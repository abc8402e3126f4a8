# Interactive access to agent pods is an exec surface outside the profile: ephemeral containers
# (kubectl debug) are denied unless the settings allow them, and exec, attach and port-forward
# are allowed only to the groups the settings name.
package agentvm

# Fields used only in messages are read with defaults, so that a request without them is still
# denied (an undefined sprintf argument would make the whole rule undefined: fail open).
request_field(name) := object.get(input.request, name, "")

connect_kind := object.get(input.request, "subResource", "connect")

unknown_reason := object.get(input.target, "unknown_reason", "no cluster access")

deny contains msg if {
	input.action == "ephemeral"
	not settings.debug.allow_ephemeral_containers
	msg := sprintf(
		"ephemeral containers (kubectl debug) are not allowed on agent pod %v/%v: they would add an exec surface the profile does not have",
		[request_field("namespace"), request_field("name")],
	)
}

connect_allowed if {
	some group in input.request.userInfo.groups
	some allowed in settings.debug.connect_allowed_groups
	group == allowed
}

deny contains msg if {
	input.action == "connect"
	input.target.agent == true
	not connect_allowed
	msg := sprintf(
		"%v into agent pod %v/%v is not allowed: only the groups in settings debug.connect_allowed_groups may",
		[connect_kind, request_field("namespace"), request_field("name")],
	)
}

deny contains msg if {
	input.action == "connect"
	input.target.known == false
	settings.debug.connect_unknown_pod == "deny"
	not connect_allowed
	msg := sprintf(
		"%v into pod %v/%v is not allowed: agentvm cannot tell whether it is an agent (%v)",
		[connect_kind, request_field("namespace"), request_field("name"), unknown_reason],
	)
}

warn contains msg if {
	input.action == "connect"
	input.target.known == false
	settings.debug.connect_unknown_pod == "allow"
	msg := sprintf(
		"agentvm could not look up pod %v/%v (%v): %v allowed without knowing whether it is an agent",
		[request_field("namespace"), request_field("name"), unknown_reason, connect_kind],
	)
}
