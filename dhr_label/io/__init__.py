"""File formats: the HDF5 contract, PNG masks and images, run manifests."""
