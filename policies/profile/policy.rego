# The effective profile of an agent pod: the one it requests (label first, then annotation),
# when it is a known profile that the settings allow. Anything else is denied, never silently
# replaced by another profile.
package agentvm

known_profiles := {"no-exec", "sidecar-exec", "exec-pod", "dispatcher"}

requested_profile := p if {
	p := input.pod.metadata.labels["agentvm.dev/profile"]
} else := p if {
	p := input.pod.metadata.annotations["agentvm.dev/profile"]
} else := "no-exec"

profile_allowed(p) if {
	some allowed in settings.allowed_profiles
	allowed == p
}

profile := requested_profile if {
	requested_profile in known_profiles
	profile_allowed(requested_profile)
}

deny contains msg if {
	input.action == "admit"
	not requested_profile in known_profiles
	msg := sprintf(
		"unknown profile %v in agentvm.dev/profile: use one of no-exec, sidecar-exec, exec-pod, dispatcher",
		[requested_profile],
	)
}

deny contains msg if {
	input.action == "admit"
	requested_profile in known_profiles
	not profile_allowed(requested_profile)
	msg := sprintf("profile %v is not allowed here (allowed: %v)", [requested_profile, concat(", ", settings.allowed_profiles)])
}
