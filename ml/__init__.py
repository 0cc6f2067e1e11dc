"""Training-side code of spotrun: the contract, the checkpoint library and the sample job."""
