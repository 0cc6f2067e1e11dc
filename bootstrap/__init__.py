"""Code that runs on the training instance at boot and under the supervisor."""
