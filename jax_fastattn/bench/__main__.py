from jax_fastattn.bench.cli import main

main()
