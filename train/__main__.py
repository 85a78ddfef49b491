from multispin_train.train import main

main()
