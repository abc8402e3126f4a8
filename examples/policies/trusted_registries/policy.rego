# Example of a user policy, added beside the shipped ones in a deployment: agent images must come from the
# registries a platform team trusts. Copy this folder next to the shipped policies (or into the
# ConfigMap the chart mounts) and list your registries in `data.yaml`.
package agentvm

default trusted_registries := []

trusted_registries := data.trusted_registries

image_trusted(image) if {
	some registry in trusted_registries
	startswith(image, concat("", [registry, "/"]))
}

# Checked on admission and on pod updates (`kubectl set image` changes a running pod's image).
deny contains msg if {
	input.action in {"admit", "update"}
	some list in ["initContainers", "containers"]
	some c in object.get(input.pod.spec, list, [])
	not c.name in {"agentvm-proxy", "agentvm-exec"}
	not image_trusted(c.image)
	msg := sprintf("container %v: image %v is not from a trusted registry (%v)", [c.name, c.image, concat(", ", trusted_registries)])
}
