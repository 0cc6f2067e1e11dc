"""Local emulators of the AWS services that spotrun uses."""
