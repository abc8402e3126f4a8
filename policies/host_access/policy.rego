# Host access cannot be made safe, so an agent pod that asks for it is denied, with a message
# that names the field. (The webhook also checks these in Rust, so a policy set without this file
# still cannot admit them; this file is where the messages and tests live.)
package agentvm

default pod_spec := {}

pod_spec := input.pod.spec if is_object(input.pod.spec)

container_lists := ["initContainers", "containers", "ephemeralContainers"]

admitting if input.action == "admit"

host_namespace_fields := ["hostNetwork", "hostPID", "hostIPC", "shareProcessNamespace"]

deny contains msg if {
	admitting
	some field in host_namespace_fields
	pod_spec[field] == true
	msg := sprintf("%v is not allowed for agent pods", [field])
}

deny contains msg if {
	admitting
	some volume in object.get(pod_spec, "volumes", [])
	volume.hostPath
	msg := sprintf("volume %v: hostPath volumes are not allowed for agent pods", [volume.name])
}

deny contains msg if {
	admitting
	some list in container_lists
	some c in object.get(pod_spec, list, [])
	c.securityContext.privileged == true
	msg := sprintf("container %v (%v): privileged is not allowed", [c.name, list])
}

deny contains msg if {
	admitting
	some list in container_lists
	some c in object.get(pod_spec, list, [])
	some port in object.get(c, "ports", [])
	object.get(port, "hostPort", 0) != 0
	msg := sprintf("container %v (%v): hostPort %v is not allowed", [c.name, list, port.hostPort])
}

deny contains msg if {
	admitting
	some list in container_lists
	some c in object.get(pod_spec, list, [])
	added := object.get(c, ["securityContext", "capabilities", "add"], [])
	count(added) > 0
	msg := sprintf("container %v (%v): capabilities.add %v is not allowed", [c.name, list, added])
}

deny contains msg if {
	admitting
	some list in container_lists
	some c in object.get(pod_spec, list, [])
	c.securityContext.runAsUser == 0
	msg := sprintf("container %v (%v): runAsUser 0 (root) is not allowed", [c.name, list])
}

deny contains "pod securityContext.runAsUser 0 (root) is not allowed" if {
	admitting
	pod_spec.securityContext.runAsUser == 0
}

deny contains "Windows pods (spec.os.name: windows) are not supported for agents" if {
	admitting
	pod_spec.os.name == "windows"
}
