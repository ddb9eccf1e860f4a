"""One module per op: schema registration, fake, kernels, autograd and the public function."""
