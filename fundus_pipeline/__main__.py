from fundus_pipeline.cli import main

main()
